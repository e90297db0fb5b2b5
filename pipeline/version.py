"""sinktrace's version, where every module can import it (the package's __init__ imports the command's modules)."""

__version__ = "0.1.0"
