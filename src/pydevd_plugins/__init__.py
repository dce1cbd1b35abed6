# Namespace package shared with debugpy's bundled pydevd (its extension mechanism requires this preamble).
try:
    __import__("pkg_resources").declare_namespace(__name__)
except ImportError:
    import pkgutil

    __path__ = pkgutil.extend_path(__path__, __name__)
