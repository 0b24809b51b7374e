"""ledgermesh: the command line and the dev stack (embedded NATS, demo)."""
