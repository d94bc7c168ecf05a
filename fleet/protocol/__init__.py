"""Wire protocols between terminals and the fleet.  Each version lives in its own module."""
