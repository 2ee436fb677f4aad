#!/usr/bin/env python
"""Start nodeflow's HTTP + WebSocket server, which speaks ComfyUI's API.

    python server.py [--listen HOST] [--port 8188] [--base-dir DIR] [--auth-token TOKEN] ...
    python server.py --help
"""

import sys

from nodeflow.server.serve_cli import main

if __name__ == "__main__":
    sys.exit(main())
