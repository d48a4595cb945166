"""The money: wallets and their Lua scripts, the catalog, and the signed internal HTTP API."""
