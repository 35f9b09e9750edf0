// Graceful close through the Swift API: the default 3 s of `shutdown()`, half-close
// delivery, a 0 or negative timeout, sends from threads racing a shutdown, a server
// shutdown of connections in mixed states, and a client shutdown's half-close. Times are
// only upper bounds with generous slack (and a lower bound for a deadline not to fire early).
#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Foundation
import KNet
import Testing

extension KNetTests {
    @Test("shutdown(): queued bytes then FIN, the peer's later bytes delivered, ETIMEDOUT after the default 3 s")
    func shutdownDefaultTimeout() throws {
        let refused = Locked<KNetError?>(nil)
        let handler = RecordingHandler(onConnect: { conn in
            try? conn.send(Array("bye".utf8))
            conn.shutdown()
            do { try conn.send([1]) } catch let error as KNetError { refused.withLock { $0 = error } } catch {}
        })
        let server = try ServerHarness(handler: handler, codec: nil)
        let start = ContinuousClock.now
        let peer = try PlainSocket(port: server.port)
        #expect(try peer.read(exactly: 3) == Array("bye".utf8))
        #expect(try peer.read() == [], "EOF after the queued bytes")
        try peer.write(Array("late".utf8))
        #expect(eventually { handler.only?.bytes == Array("late".utf8) }, "delivered after our FIN")
        #expect(eventually(.seconds(15)) { handler.only?.disconnects == 1 })
        let elapsed = ContinuousClock.now - start
        #expect(elapsed >= .milliseconds(2400), "not before the default 3 s: \(elapsed)")
        #expect(handler.only?.reasonAtDisconnect == .error(.system(errno: ETIMEDOUT)))
        #expect(refused.withLock { $0 } == .connectionClosed)
        #expect(server.stop() == .serverClosed)
        _ = peer
    }

    @Test("close(timeout:) with zero or a negative timeout ends at once with ETIMEDOUT after writing what fits",
          arguments: [Duration.zero, .milliseconds(-5), .seconds(-3)])
    func closeWithNonPositiveTimeout(timeout: Duration) throws {
        let handler = RecordingHandler(onConnect: { conn in
            try? conn.send(Array("bye".utf8))
            conn.close(timeout: timeout)
        })
        let server = try ServerHarness(handler: handler, codec: nil)
        let peer = try PlainSocket(port: server.port)
        #expect(eventually { handler.only?.disconnects == 1 })
        #expect(handler.only?.reasonAtDisconnect == .error(.system(errno: ETIMEDOUT)))
        #expect(try peer.read(exactly: 3) == Array("bye".utf8))
        #expect(server.stop() == .serverClosed)
    }

    @Test("sends from 4 threads racing shutdown(): every accepted send arrives in its thread's order, then EOF")
    func sendsRacingShutdown() throws {
        let connection = Locked<TCPConnection?>(nil)
        let handler = RecordingHandler(onConnect: { conn in connection.withLock { $0 = conn } })
        let server = try ServerHarness(handler: handler, codec: nil)
        let peer = try PlainSocket(port: server.port)
        #expect(eventually { connection.withLock { $0 } != nil })
        let conn = try #require(connection.withLock { $0 })
        let threads = 4
        let accepted = Locked([Int](repeating: 0, count: threads))
        let afterRefusal = Locked(0)
        var senders: [Background] = []
        for thread in 0..<threads {
            senders.append(Background {
                var sequence: UInt32 = 0
                let deadline = ContinuousClock.now + .seconds(20)
                while ContinuousClock.now < deadline {
                    let record = withUnsafeBytes(of: (UInt32(thread), sequence)) { Array($0) }
                    do {
                        try conn.send(record)
                        sequence += 1
                        accepted.withLock { $0[thread] = Int(sequence) }
                    } catch KNetError.connectionClosed {
                        break
                    } catch KNetError.pendingSendFull {
                        continue
                    }
                }
                // Once refused, refused for good.
                for _ in 0..<10 where (try? conn.send([0])) != nil { afterRefusal.withLock { $0 += 1 } }
            })
        }
        #expect(eventually { accepted.withLock { $0.allSatisfy { $0 >= 500 } } })
        conn.shutdown()
        for sender in senders { #expect(sender.join() == nil) }
        var bytes: [UInt8] = []
        try peer.readToEnd { bytes += $0 }
        let counts = accepted.withLock { $0 }
        #expect(bytes.count == counts.reduce(0, +) * 8)
        var next = [UInt32](repeating: 0, count: threads)
        var misordered = 0
        for offset in stride(from: 0, to: bytes.count - bytes.count % 8, by: 8) {
            let (thread, sequence) = bytes.withUnsafeBytes {
                ($0.loadUnaligned(fromByteOffset: offset, as: UInt32.self),
                 $0.loadUnaligned(fromByteOffset: offset + 4, as: UInt32.self))
            }
            guard Int(thread) < threads, next[Int(thread)] == sequence else {
                misordered += 1
                continue
            }
            next[Int(thread)] += 1
        }
        #expect(misordered == 0)
        #expect(next.map { Int($0) } == counts)
        #expect(afterRefusal.withLock { $0 } == 0)
        peer.shutdownWrite()
        #expect(eventually { handler.only?.disconnects == 1 })
        #expect(handler.only?.reasonAtDisconnect == .local)
        #expect(server.stop() == .serverClosed)
    }

    @Test("server shutdown(timeout:) with 60 connections in mixed states: one connect(false) each, back in time")
    func serverShutdownMixedStates() throws {
        let handler = RecordingHandler(onConnect: { conn in try? conn.send([UInt8](repeating: 7, count: 1000)) })
        let server = try ServerHarness(handler: handler, codec: nil)
        let count = 60
        var peers: [PlainSocket?] = []
        var kinds: [Int: Int] = [:] // peer port -> 0 never reads nor closes, 1 resets, 2 reads to EOF and closes
        for index in 0..<count {
            let peer = try PlainSocket(port: server.port)
            kinds[try #require(shutdownTestLocalPort(peer.fd))] = index % 3
            peers.append(peer)
        }
        #expect(eventually { handler.connectionCount == count })
        let start = ContinuousClock.now
        server.server.shutdown(timeout: .seconds(2))
        server.server.shutdown(timeout: .milliseconds(1)) // a second one changes nothing
        for index in 0..<count where index % 3 == 1 {
            var noLinger = linger(l_onoff: 1, l_linger: 0)
            setsockopt(peers[index]!.fd, SOL_SOCKET, SO_LINGER, &noLinger, socklen_t(MemoryLayout<linger>.size))
            peers[index] = nil // closed: a reset
        }
        for index in 0..<count where index % 3 == 2 {
            var received = 0
            try peers[index]!.readToEnd { received += $0.count }
            #expect(received == 1000)
            peers[index] = nil // closed after EOF
        }
        #expect(server.serving.join(timeout: 20) as? KNetError == .serverClosed)
        let elapsed = ContinuousClock.now - start
        #expect(elapsed < .seconds(15), "listenAndServe returned \(elapsed) after a 2 s shutdown")
        let snapshot = handler.snapshot
        #expect(snapshot.contractFailures == 0)
        #expect(snapshot.connections.count == count)
        for record in snapshot.connections.values {
            #expect(record.connects == 1)
            #expect(record.disconnects == 1)
            let port = record.object?.remoteAddress.flatMap(shutdownTestPort) ?? -1
            switch kinds[port] {
            case 0: #expect(record.reasonAtDisconnect == .error(.system(errno: ETIMEDOUT)))
            case 1: #expect(record.reasonAtDisconnect == .error(.system(errno: ECONNRESET))
                            || record.reasonAtDisconnect == .error(.system(errno: EPIPE)))
            case 2: #expect(record.reasonAtDisconnect == .local)
            default: Issue.record("no peer for port \(port)")
            }
        }
        #expect(server.server.stats.live == 0)
        _ = peers
    }

    @Test("client shutdown(timeout:): the server's answers after our FIN are delivered, then clientClosed")
    func clientShutdownHalfClose() throws {
        let server = try ServerHarness(handler: RecordingHandler(echo: true), codec: nil)
        let handler = RecordingHandler()
        let client = ClientHarness(port: server.port, handler: handler, codec: nil)
        #expect(eventually { client.client.connection != nil })
        let conn = try #require(client.client.connection)
        try conn.send(Array("ping".utf8))
        client.client.shutdown(timeout: .seconds(10))
        #expect(throws: KNetError.connectionClosed) { try conn.send([1]) }
        #expect(client.serving.join() as? KNetError == .clientClosed)
        // The echo of "ping" went out before the server read our FIN, and came in after it.
        #expect(handler.only?.bytes == Array("ping".utf8))
        #expect(handler.only?.reasonAtDisconnect == .local)
        #expect(handler.only?.disconnects == 1)
        #expect(server.stop() == .serverClosed)
    }
}

/// The local port of a socket, or nil when getsockname fails.
private func shutdownTestLocalPort(_ fd: Int32) -> Int? {
    var address = sockaddr_in()
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let rc = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
    }
    return rc == 0 ? Int(UInt16(bigEndian: address.sin_port)) : nil
}

/// The port of an "ip:port" string.
private func shutdownTestPort(_ address: String) -> Int? {
    guard let colon = address.lastIndex(of: ":") else { return nil }
    return Int(address[address.index(after: colon)...])
}
