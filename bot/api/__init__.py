"""HTTP handlers: parse, call the core, render. Nothing imports this package but `bot.app`."""
