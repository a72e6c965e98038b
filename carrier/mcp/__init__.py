"""The MCP door: an MCPServer (stdio now, streamable HTTP later) with Carrier's tools."""
