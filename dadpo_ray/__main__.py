import sys

from dadpo_ray.cli import main

sys.exit(main())
