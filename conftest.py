"""Test configuration shared by tests/ (markers live in pytest.ini)."""
