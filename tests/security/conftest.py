from tests.session.conftest import stub

__all__ = ["stub"]
