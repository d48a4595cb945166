"""The realtime path: WebSocket upgrades, connections, rooms, fan-out and the ops feed."""
