"""`python -m kosmos_jax.commands ...` is `kosmos-jax ...`."""

from kosmos_jax.commands import main

main()
