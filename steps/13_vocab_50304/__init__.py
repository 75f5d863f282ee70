"""The vocabulary padded to 50304 = 393 x 128 rows: friendlier matmul shapes; the padded ids are never predicted."""
