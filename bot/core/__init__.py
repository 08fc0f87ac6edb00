"""What the bot does, independent of HTTP: validation, commands, context, preferences."""
