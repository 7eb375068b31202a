"""The ``ray`` command line with imgpipe's loopback patches applied before Ray starts anything.

``python -m tests.ray_node start --head --node-ip-address=127.0.0.1 ...`` is ``ray start`` whose
node keeps 127.0.0.1 (plain Ray rewrites it to the machine's network address) and starts neither
the dashboard's API server (which probes the cloud metadata address) nor a Ray client server.
Every Ray process the tests start goes through here or through ``imgpipe.distribute``; never
run the plain ``ray`` command (nor ``ray stop``, which kills every Ray process of the machine).
"""

from __future__ import annotations

import sys

from imgpipe.distribute import _prepare_ray

if __name__ == "__main__":
    ray = _prepare_ray(local=False)
    # Nor the Ray client server (ray://), which the tests do not use: it would be one more
    # Python process to start, on the fixed port 10001 unless told another.
    ray._private.node.Node.start_ray_client_server = lambda self: None
    from ray.scripts.scripts import main

    sys.argv[0] = "ray"
    sys.exit(main())
