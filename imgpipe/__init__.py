"""imgpipe's command-line client: `imgpipe upload|status|download|retry|serve|dev`.

The commands talk to the REST gateway with aiohttp (`imgpipe.client`), follow live progress
over Server-Sent Events (`imgpipe.events`), and render what they get with pure functions
(`imgpipe.render`). `imgpipe.cli` parses the arguments and maps outcomes to exit codes.
"""
