"""``python -m marketing_sim``: the same as ``gridpay marketing``."""

from marketing_sim.app import main

raise SystemExit(main())
