from tests.session.conftest import protocol, stub

__all__ = ["protocol", "stub"]
