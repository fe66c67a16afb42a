"""The web's faults for bench/ingest_img2dataset.sh: an HTTP/1.1 server on one loopback address.

Usage: fault_server.py WWW_DIR HOST PORT

Routes (GET; every response closes the connection):
- /status/<code>: that status with a short body (403, 500, ...);
- /reset: closes the connection with a TCP reset, without answering;
- /hang: reads the request and never answers (headers that never come);
- /drip/<file>: the file from WWW_DIR, its length announced, dripped over 6 s;
- /truncated/<file>: the file's full length announced, half of it sent, then the close.
"""

import asyncio
import os
import socket
import struct
import sys

www, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])


def head(status: str, length: int, ctype: str = "image/jpeg") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {length}\r\n"
            "Connection: close\r\n\r\n").encode()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        request = await reader.readuntil(b"\r\n\r\n")
        path = request.split(b" ", 2)[1].decode().split("?")[0]
        route, _, rest = path.lstrip("/").partition("/")
        if route == "status":
            code = int(rest or "500")
            body = b"error"
            writer.write(head(f"{code} Status", len(body), "text/plain") + body)
        elif route == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        elif route == "hang":
            await asyncio.sleep(3600)
        elif route in ("drip", "truncated"):
            with open(os.path.join(www, os.path.basename(rest)), "rb") as f:
                data = f.read()
            writer.write(head("200 OK", len(data)))
            if route == "truncated":
                writer.write(data[: len(data) // 2])
            else:
                step = max(1, len(data) // 30)
                for i in range(0, len(data), step):
                    writer.write(data[i : i + step])
                    await writer.drain()
                    await asyncio.sleep(0.2)
        else:
            writer.write(head("404 Not Found", 0, "text/plain"))
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, OSError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(handle, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


asyncio.run(main())
