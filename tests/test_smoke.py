from distributed.utils_test import cluster, gen_cluster, inc
from distributed import Executor


@gen_cluster(executor=True)
async def test_submit_in_process_cluster(e, s, a, b):
    x = e.submit(inc, 1)
    y = e.submit(inc, x)
    assert await y == 3
    assert y.key in s.state.tasks


def test_map_on_cli_cluster():
    with cluster() as (addr, _, _):
        with Executor(addr) as e:
            assert e.gather(e.map(inc, range(10))) == list(range(1, 11))
