"""Talking to AWS: the aiobotocore clients, the lean JSON client and HTTP/1.1 pool of the data
path, and the rules that sort an error into the record's own fault or one to retry.

Imports only `errors` and `config`: everything else in the package builds on this one.
"""
