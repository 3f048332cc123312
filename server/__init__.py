"""vvireid query server: FastAPI app, micro-batched query engine and a small web page.

Run it with ``vvireid-serve --checkpoint CKPT --index INDEX_DIR`` or build the app yourself::

    from vvireid.server.app import create_app
    from vvireid.server.settings import ServerSettings
    app = create_app(ServerSettings(checkpoint="model.safetensors", index="gallery/"))
"""
