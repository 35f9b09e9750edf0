// Fault tests through the Swift API: a peer resetting under a large queue, a peer that
// never reads, graceful shutdown under load, and connect/close churn.
#if canImport(Glibc)
import Glibc
#endif
import KNet
import Testing

extension KNetTests {
    @Test("a peer reset while a large queue is sent ends that connection once with an error; the server goes on")
    func faultPeerResetDuringLargeQueue() throws {
        let chunk = 64 * 1024
        let chunks = 128  // 8 MiB: more than the 4 MiB send buffer plus a small receive window
        let total = chunk * chunks
        let sendErrors = Locked(0)
        let queued = Locked(false)
        let messages = (0..<chunks).map { pattern(chunk, offset: $0 * chunk) }
        // Only the first connection gets the large queue; later ones just echo.
        let handler = RecordingHandler(echo: true, onConnect: { conn in
            guard conn.userdata as? Int == 0 else { return }
            for message in messages {
                do { try conn.send(message) } catch { sendErrors.withLock { $0 += 1 } }
            }
            queued.withLock { $0 = true }
        })
        let server = try ServerHarness(handler: handler, codec: nil)
        do {
            // The small receive buffer is set before connecting: shrinking it after the
            // handshake makes Linux drop data already in flight and stall on retransmits.
            let fd = try smallWindowSocket(port: server.port, receiveBuffer: 4096)
            defer { Glibc.close(fd) }  // with SO_LINGER {1, 0} below, this sends an RST
            // Reading a little proves the queue is flowing before the reset.
            var buffer = [UInt8](repeating: 0, count: 4096)
            var received: [UInt8] = []
            while received.count < chunk {
                let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                if n < 0 && errno == EINTR { continue }
                try #require(n > 0, "read failed or EOF before the reset")
                received += buffer[0..<n]
            }
            #expect(received == pattern(received.count))
            // Reset only once the whole queue is in: a reset racing the sends makes them
            // throw (the first with the reset's errno, then .connectionClosed).
            #expect(eventually { queued.withLock { $0 } })
            var value = linger(l_onoff: 1, l_linger: 0)
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &value, socklen_t(MemoryLayout<linger>.size))
        }
        #expect(eventually { handler.snapshot.connections[0]?.disconnects == 1 })
        #expect(sendErrors.withLock { $0 } == 0)
        // Most of the queue was still unwritten when the reset came.
        #expect(server.server.stats.bytesOut < UInt64(total))

        let second = try PlainSocket(port: server.port)
        try second.write([1, 2, 3, 4, 5])
        #expect(try second.read(exactly: 5) == [1, 2, 3, 4, 5])
        let message = pattern(100_000, offset: 7)
        try second.write(message)
        #expect(try second.read(exactly: message.count) == message)

        #expect(server.stop() == .serverClosed)
        let first = try #require(handler.snapshot.connections[0])
        #expect(first.connects == 1)
        #expect(first.disconnects == 1)
        let reason = try #require(first.reasonAtDisconnect)
        let acceptable: [CloseReason] = [
            .error(.system(errno: ECONNRESET)), .error(.system(errno: EPIPE)), .error(.endOfStream),
        ]
        #expect(acceptable.contains(reason), "close reason \(reason)")
        #expect(first.object?.closeReason == reason)
        #expect(handler.snapshot.connections[1]?.disconnects == 1)
        #expect(handler.snapshot.contractFailures == 0)
    }

    @Test("a peer that never reads: pendingSendFull at the byte bound, then exactly the accepted messages in order")
    func faultPeerNeverReads() throws {
        let handler = RecordingHandler()
        let server = try ServerHarness(handler: handler, codec: nil)
        let peer = try PlainSocket(port: server.port)
        #expect(eventually { handler.only?.object != nil })
        let conn = try #require(handler.only?.object)
        conn.setMaxQueuedBytes(1 << 20)
        let chunk = 64 * 1024
        // Message i carries pattern bytes [i * chunk, (i + 1) * chunk), so the stream of
        // accepted messages is one continuous pattern; a refused one that leaked through
        // (or a reordering) would show as a mismatch.
        var accepted = 0
        var thrown: KNetError?
        while accepted < 2000 {
            do {
                try conn.send(pattern(chunk, offset: accepted * chunk))
                accepted += 1
            } catch let error as KNetError {
                thrown = error
                break
            }
        }
        #expect(thrown == .pendingSendFull)
        #expect(accepted > 0)
        // The bound holds: what is queued plus what the kernel holds, far below 2000 messages.
        #expect(accepted < 200)

        let drained = try peer.read(exactly: accepted * chunk)
        #expect(drained.count == accepted * chunk)
        #expect(drained == pattern(accepted * chunk))

        // Every accepted byte reached the peer, so the queue is empty: sends succeed again.
        let more = 4
        for index in accepted..<accepted + more {
            try conn.send(pattern(chunk, offset: index * chunk))
        }
        let tail = try peer.read(exactly: more * chunk)
        #expect(tail == pattern(more * chunk, offset: accepted * chunk))
        // Counted after the write returned, which the peer's read can overtake.
        #expect(eventually { server.server.stats.bytesOut == UInt64((accepted + more) * chunk) })
        #expect(server.stop() == .serverClosed)
        _ = peer
    }

    @Test("graceful server shutdown with 20 loaded connections delivers every stream whole, then EOF")
    func faultGracefulShutdownUnderLoad() throws {
        let peers = 20
        let streamBytes = 256 * 1024
        let queued = Locked(0)
        let sendErrors = Locked(0)
        // Each connection's stream is keyed by the peer's port, which both sides know.
        let handler = RecordingHandler(onConnect: { conn in
            guard let port = conn.remoteAddress.flatMap(portOf) else {
                sendErrors.withLock { $0 += 1 }
                return
            }
            let bytes = stream(seed: port, count: streamBytes)
            // Several messages, so the queue holds more than one entry per connection.
            var offset = 0
            while offset < bytes.count {
                let end = min(offset + 48 * 1024, bytes.count)
                do { try conn.send(bytes[offset..<end]) } catch { sendErrors.withLock { $0 += 1 } }
                offset = end
            }
            queued.withLock { $0 += 1 }
        })
        let server = try ServerHarness(handler: handler, codec: nil)
        var sockets: [PlainSocket] = []
        for _ in 0..<peers {
            sockets.append(try PlainSocket(port: server.port))
        }
        #expect(eventually { queued.withLock { $0 } == peers })
        #expect(sendErrors.withLock { $0 } == 0)
        server.server.shutdown(timeout: .seconds(10))

        for socket in sockets {
            let port = try #require(localPort(of: socket))
            var received: [UInt8] = []
            received.reserveCapacity(streamBytes)
            try socket.readToEnd { received += $0 }
            #expect(received.count == streamBytes)
            #expect(received == stream(seed: port, count: streamBytes), "stream of peer port \(port)")
            socket.shutdownWrite()
        }
        #expect(server.serving.join() as? KNetError == .serverClosed)
        let snapshot = handler.snapshot
        #expect(snapshot.connections.count == peers)
        for record in snapshot.connections.values {
            #expect(record.connects == 1)
            #expect(record.disconnects == 1)
            #expect(record.reasonAtDisconnect == .local)
        }
        #expect(server.server.stats.bytesOut == UInt64(peers * streamBytes))
        #expect(server.server.stats.live == 0)
        _ = sockets
    }

    @Test("500 connect/close cycles from 4 threads: callbacks balanced, accepted exact, no connection leaked")
    func faultConnectCloseChurn() throws {
        let threads = 4
        let cyclesPerThread = 125
        let handler = ChurnHandler()
        let server = try ServerHarness(handler: handler, codec: nil)
        let port = server.port
        let failures = Locked(0)
        let workers = (0..<threads).map { thread in
            Background {
                for cycle in 0..<cyclesPerThread {
                    do {
                        let peer = try PlainSocket(port: port)
                        // Plain FIN, FIN after data, and RST.
                        switch (thread + cycle) % 3 {
                        case 0: break
                        case 1: try peer.write(pattern(100, offset: cycle))
                        default: resetOnClose(peer)
                        }
                    } catch {
                        failures.withLock { $0 += 1 }
                    }
                }
            }
        }
        for worker in workers { #expect(worker.join() == nil) }
        #expect(failures.withLock { $0 } == 0)
        let total = threads * cyclesPerThread
        #expect(eventually { server.server.stats.accepted == UInt64(total) && server.server.stats.live == 0 })
        #expect(server.stop() == .serverClosed)
        // listenAndServe returned: every callback has run and knet released its references.
        let state = handler.state.withLock { $0 }
        let stats = server.server.stats
        #expect(state.connects == total)
        #expect(state.disconnects == state.connects)
        #expect(UInt64(state.connects) == stats.accepted)
        #expect(stats.live == 0)
        #expect(state.seen.count == total)
        #expect(state.seen.allSatisfy { $0.object == nil }, "a TCPConnection outlived its connection")
    }
}

/// Counts connection events and keeps a weak reference to every TCPConnection.
final class ChurnHandler: TCPHandler {
    struct WeakConnection: Sendable {
        weak var object: TCPConnection?
    }
    struct State: Sendable {
        var connects = 0
        var disconnects = 0
        var seen: [WeakConnection] = []
    }

    let state = Locked(State())

    func connect(_ conn: TCPConnection, connected: Bool) {
        state.withLock { state in
            if connected {
                state.connects += 1
                state.seen.append(WeakConnection(object: conn))
            } else {
                state.disconnects += 1
            }
        }
    }
}

/// Makes the socket's close send an RST (SO_LINGER {1, 0}).
func resetOnClose(_ socket: PlainSocket) {
    var value = linger(l_onoff: 1, l_linger: 0)
    setsockopt(socket.fd, SOL_SOCKET, SO_LINGER, &value, socklen_t(MemoryLayout<linger>.size))
}

/// A blocking socket connected to 127.0.0.1:port whose receive buffer (and so its window)
/// was shrunk before the handshake; it has a 20 s receive timeout. The caller closes it.
private func smallWindowSocket(port: Int, receiveBuffer: Int32) throws -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw KNetError.system(errno: errno) }
    var size = receiveBuffer
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    var timeout = timeval(tv_sec: 20, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    let rc = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
        }
    }
    guard rc == 0 else {
        let error = errno
        Glibc.close(fd)
        throw KNetError.system(errno: error)
    }
    return fd
}

/// The socket's local port, or nil when getsockname fails.
private func localPort(of socket: PlainSocket) -> Int? {
    var address = sockaddr_in()
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let rc = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(socket.fd, $0, &length) }
    }
    return rc == 0 ? Int(UInt16(bigEndian: address.sin_port)) : nil
}

/// The port of an "ip:port" string.
private func portOf(_ address: String) -> Int? {
    guard let colon = address.lastIndex(of: ":") else { return nil }
    return Int(address[address.index(after: colon)...])
}

/// A pseudo-random byte stream determined by `seed` (xorshift64).
private func stream(seed: Int, count: Int) -> [UInt8] {
    var state = UInt64(truncatingIfNeeded: seed) &* 0x9E37_79B9_7F4A_7C15 | 1
    var result = [UInt8](repeating: 0, count: count)
    for index in 0..<count {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        result[index] = UInt8(truncatingIfNeeded: state >> 24)
    }
    return result
}
