"""The OpenAI chat-completions API as buyers speak it: pure, no I/O.

- :mod:`.request`: the request body, decoded and limited at the edge;
- :mod:`.response`: response shapes, SSE framing, error bodies;
- :mod:`.completions`: how one request's output becomes those shapes.
"""
