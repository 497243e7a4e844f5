"""calwebb_coron3 composed: an association opened and checked (``observation``), its lazy
products built (``build``), and a run that builds them for its workers and writes them in one
computation (``run``)."""
