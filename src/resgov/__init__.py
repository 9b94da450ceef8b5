"""ResGov: the budget firewall between autonomous AI agents and the money they spend."""

__version__ = "0.4.0"
