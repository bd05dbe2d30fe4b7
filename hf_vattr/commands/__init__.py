"""Front ends: ``hf-vattr`` (collect, train, eval, push, demo, app). Nothing in the package imports them."""
