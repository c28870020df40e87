"""A record on its way through the pipeline (`Envelope`, `Tenure`, `DeadLetter`) and the
fields every record shares (`Name`, `StatusTime`). Imports only `errors`: every stage may
import it.
"""
