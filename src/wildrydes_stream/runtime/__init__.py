"""Asyncio building blocks every stage shares: the byte budget, background tasks, waiting on an
event or a deadline, signal handling and the start-up heap settings.

Imports nothing of the project but `errors`: any package may import it.
"""
