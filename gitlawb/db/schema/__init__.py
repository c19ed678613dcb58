"""The schema migrations, one SQL file each: NNNN_name.sql."""
