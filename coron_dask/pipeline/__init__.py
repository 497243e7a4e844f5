"""calwebb_coron3 composed: association in, lazy products out (``build``); a run builds them for
its workers and writes them in one computation (``run``)."""
