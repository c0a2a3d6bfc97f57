__title__ = "tokenhub_stream"
__version__ = "0.1.0.dev0"
