"""The local stack of `make run`: the launcher, its supervisor and the embedded Postgres and
Redis (the `local` extra). No service imports it; the image's check skips it."""
