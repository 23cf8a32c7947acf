"""Helpers shared by the tests: generated data, repository copies, servers and processes. Test modules import
from here, never from each other."""
