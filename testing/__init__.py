"""Test support, shared by the test suite (tests/) and the benchmarks (bench/); neither imports
the other. One module per thing it provides:

- polling: wait_until / wait_until_async, the deadline every wait uses instead of a sleep;
- ports, processes: free TCP ports; a process's exit and its descendants, from /proc;
- databases: throwaway Postgres databases and Redis key prefixes;
- containers, seaweed: Postgres and Redis in containers; a SeaweedFS S3 server;
- stack: the whole stack as real processes (`python -m services.local`), and the CLI against it;
- services: one service as a process, with its health channel;
- uploads: the CSV of a request and its gRPC upload;
- origin, imagegen, photos: an image origin on 127.0.0.1; generated and real photographs;
- listeners: a webhook receiver and a tripwire; certs: a CA and certificates for TLS tests.
"""
