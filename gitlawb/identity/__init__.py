"""Node identity: Ed25519 keys and did:key names, signed requests, tokens."""
