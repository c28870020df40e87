"""wildrydes-stream: copies Wild Rydes unicorn aggregates from Kinesis into DynamoDB."""

__version__ = "0.1.0"
