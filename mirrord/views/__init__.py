"""The HTTP API's views, one module per concern (status, data, graphql, ...)."""
