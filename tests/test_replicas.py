"""Data-parallel replicas: every row of a batch goes to exactly one replica, shares weight the
part-batch means into the full-batch mean, and batches that would leave a replica empty are refused."""

import pytest
import torch

from dvtrain.distributed.replicas import Replicas
from dvtrain.errors import DvtrainError


@pytest.mark.parametrize("count, rows", [(2, 10), (3, 10), (4, 7), (3, 3)])
def test_shards_partition_the_rows_and_their_shares_give_the_full_batch_mean(count, rows):
    x = torch.randn(rows, 5, dtype=torch.float64)
    parts, shares = [], []
    for index in range(count):
        replica = Replicas(count, index)
        (part,) = replica.shard(x)
        parts.append(part)
        shares.append(replica.share)
    assert torch.equal(torch.cat(parts), x)  # in order, each row once
    weighted = sum(share * part.mean(dim=0) for share, part in zip(shares, parts))
    torch.testing.assert_close(weighted, x.mean(dim=0), rtol=0, atol=1e-12)


def test_one_replica_is_the_identity():
    x = torch.randn(6, 2)
    replica = Replicas()
    assert torch.equal(replica.shard(x)[0], x) and replica.share == 1.0
    assert torch.equal(replica.sum(x), x)
    replica.check_batches(num_rows=1437, batch_size=1436, key="vanilla.batch_size")  # no replicas: any batch


def test_a_batch_that_leaves_a_replica_without_rows_is_refused_naming_the_key():
    # 1437 digits training images in batches of 1436: the last batch has 1 row for 2 replicas
    with pytest.raises(DvtrainError, match=r"vanilla.batch_size=1436 .* batch of 1 row\(s\), fewer than the 2 replicas"):
        Replicas(2, 0).check_batches(num_rows=1437, batch_size=1436, key="vanilla.batch_size")
    with pytest.raises(DvtrainError, match=r"dverge.batch_size=2 .* fewer than the 3 replicas"):
        Replicas(3, 1).check_batches(num_rows=100, batch_size=2, key="dverge.batch_size")
    Replicas(2, 1).check_batches(num_rows=1437, batch_size=64, key="dverge.batch_size")  # last batch: 29 rows
