"""Operations: container files, TLS, health and metrics, admin commands."""
