"""Pure, broker-free and SQL-free core: events in, user interest vectors out."""
