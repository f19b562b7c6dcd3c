"""`kosmos-jax serve`: a grounding web page and an HTTP API over one model.

requests.py   JSON request -> prompt, picture, generation options (or a 4xx naming the problem)
batcher.py    the worker that owns the model: batches requests into one `generate` call
server.py     the HTTP routes (stdlib ThreadingHTTPServer), the page and its examples
openapi.py    the API's OpenAPI 3 description, written by hand
page.html, page.js   the page: vanilla JS, no CDN, box overlays as positioned <div>s
"""
