"""The JSON-RPC face of the agent: API document, server, dispatcher and the CLI client."""
