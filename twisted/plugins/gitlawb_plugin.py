"""
The twistd plugin: C{twistd -n gitlawb [--flag value ...]}.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer

from gitlawb.config import SETTINGS, ConfigError, Settings


class Options(usage.Options):
    """
    One flag per setting; a flag given wins over the environment variable.
    """

    optParameters = [
        [s.flag, None, None, f"{s.help} [env {s.env}, default {s.default!r}]"]
        for s in SETTINGS
    ]

    def postOptions(self) -> None:
        flags = {s.attribute: self[s.flag] for s in SETTINGS}
        try:
            self["settings"] = Settings.load(flags=flags)
        except ConfigError as e:
            # One line naming the setting, not twistd's page of usage text that
            # a UsageError would print above it.
            raise SystemExit(f"gitlawb: {e}") from None


@implementer(IServiceMaker, IPlugin)
class GitlawbServiceMaker:
    tapname = "gitlawb"
    description = "A gitlawb network node: git smart HTTP, signed API, PostgreSQL."
    options = Options

    def makeService(self, options: Any) -> Any:
        from twisted.internet import reactor

        from gitlawb.node import StartupError, make_node

        try:
            return make_node(options["settings"], reactor)
        except StartupError as e:
            raise SystemExit(f"gitlawb: {e}") from None


serviceMaker = GitlawbServiceMaker()
