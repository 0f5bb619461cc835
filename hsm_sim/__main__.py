"""`python -m hsm_sim [--host H] [--port P] [--config FILE] [--authorised]`."""

from hsm_sim.server import main

raise SystemExit(main())
