"""Helper of tests/orchestration/test_postgres.py and bench/prefect_db.py (not a test): N flow runs of a small flow at once
against the Prefect API in PREFECT_API_URL, each with T concurrent tasks; prints one JSON line with every
run's final state as the server recorded it (read back through the API) and the errors raised.

    PREFECT_API_URL=http://127.0.0.1:4200/api python tests/prefect_load.py N T
"""

import asyncio
import json
import sys
import time


async def main(n: int, tasks: int) -> dict:
    from prefect import flow, task
    from prefect.client.orchestration import get_client

    @task
    async def square(x: int) -> int:
        await asyncio.sleep(0.05)
        return x * x

    @flow(name="tk-load", persist_result=False)
    async def load(i: int) -> int:
        return sum(await asyncio.gather(*[square(i * tasks + k) for k in range(tasks)]))

    t0 = time.monotonic()
    states = await asyncio.gather(*[load(i, return_state=True) for i in range(n)], return_exceptions=True)
    seconds = time.monotonic() - t0
    errors = [f"{type(s).__name__}: {s}" for s in states if isinstance(s, BaseException)]
    ids = [s.state_details.flow_run_id for s in states if not isinstance(s, BaseException)]
    async with get_client() as client:
        runs = [await client.read_flow_run(i) for i in ids]
    return {
        "runs": n,
        "tasks_per_run": tasks,
        "seconds": round(seconds, 2),
        "server_states": sorted(r.state.type.value for r in runs),
        "local_states": sorted(s.type.value for s in states if not isinstance(s, BaseException)),
        "errors": errors,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))))
