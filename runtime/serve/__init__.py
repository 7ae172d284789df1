"""Serving V4 to many clients at once: the batching engine (`engine`) and the HTTP server in
front of it (`http`, with one module per API: `openai_api`, `anthropic_api`, `responses_api`,
over the shared conversation model in `chat`). docs/serve.md describes both."""
