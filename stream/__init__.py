"""Kafka side: event schema, Faust worker, producers, replay, backtest, CLI."""
