"""What every front end shares: the opening, admission, settlement, metering, the catalogue."""
