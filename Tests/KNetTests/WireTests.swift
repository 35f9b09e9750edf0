// Peers that misbehave on the wire against a Swift server: a Swift codec's frames
// dribbled a byte per write (each read by knet before the next goes), split at every
// position, many in one write, exactly the limit and one byte over; urgent data in a raw
// stream (the Swift layer's read-into-array path); a half-close with a queue waiting.
#if canImport(Glibc)
import Glibc
#endif
import Foundation
import KNet
import Synchronization
import Testing

/// A user codec in Swift: 'S', a 2-byte big-endian length, the body; frames up to 3 + 200.
struct WireCodec: Codec {
    static let maxBody = 200
    var maxFrameSize: Int { 3 + Self.maxBody }

    func read(from reader: inout ByteReader) throws -> [UInt8] {
        guard try reader.readInteger(as: UInt8.self) == UInt8(ascii: "S") else { throw KNetError.codec }
        let length = try reader.readInteger(as: UInt16.self)
        return try reader.readBytes(Int(length))
    }

    func write(to writer: inout ByteWriter, _ message: [UInt8]) throws {
        writer.writeInteger(UInt8(ascii: "S"))
        writer.writeInteger(UInt16(message.count))
        writer.writeBytes(message)
    }

    static func frame(_ body: [UInt8]) -> [UInt8] {
        [UInt8(ascii: "S"), UInt8(body.count >> 8), UInt8(body.count & 0xFF)] + body
    }
}

/// Process CPU time (user + system) in milliseconds.
private func cpuMilliseconds() -> Double {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) * 1000
        + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1000
}



/// A plain listener on 127.0.0.1 (kernel-chosen port) handing out accepted descriptors.
final class PlainListener {
    let port: Int
    let fd: Int32

    init() throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let fd = fd
        _ = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard listen(fd, 8) == 0 else { throw KNetError.system(errno: errno) }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        port = Int(UInt16(bigEndian: address.sin_port))
    }

    deinit { Glibc.close(fd) }

    /// Accepts one connection (waits at most 20 s).
    func accept() throws -> PlainSocket {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, 20_000) == 1 else { throw KNetError.system(errno: ETIMEDOUT) }
        let c = Glibc.accept(fd, nil, nil)
        guard c >= 0 else { throw KNetError.system(errno: errno) }
        var one: Int32 = 1
        setsockopt(c, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        return PlainSocket(adopting: c)
    }
}

/// Counts connect(true) / connect(false) and checks they pair per connection.
final class PairCounter: TCPHandler {
    let ups = Atomic<Int>(0)
    let downs = Atomic<Int>(0)
    let unpaired = Atomic<Int>(0)

    func connect(_ conn: TCPConnection, connected: Bool) {
        if connected {
            if conn.userdata != nil { unpaired.add(1, ordering: .relaxed) }
            conn.userdata = 1
            ups.add(1, ordering: .relaxed)
        } else {
            if (conn.userdata as? Int) != 1 { unpaired.add(1, ordering: .relaxed) }
            downs.add(1, ordering: .relaxed)
        }
    }

    func receive(_ conn: TCPConnection, _ buf: [UInt8]) {}
}

/// A plain listener on 127.0.0.1 whose thread accepts and at once closes or resets.
final class AcceptAndClose: @unchecked Sendable {
    let port: Int
    private let fd: Int32
    private let stopFlag = Locked(false)
    let accepted = Locked(0)
    private let thread: Background

    init(reset: Bool) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        _ = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        listen(fd, 64)
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        self.fd = fd
        port = Int(UInt16(bigEndian: address.sin_port))
        let stopFlag = stopFlag, accepted = accepted
        thread = Background {
            while !stopFlag.withLock({ $0 }) {
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                if poll(&p, 1, 20) <= 0 { continue }
                let c = accept(fd, nil, nil)
                if c < 0 { continue }
                if reset {
                    var lg = linger(l_onoff: 1, l_linger: 0)
                    setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, socklen_t(MemoryLayout<linger>.size))
                }
                Glibc.close(c)
                accepted.withLock { $0 += 1 }
            }
        }
    }

    func stop() {
        stopFlag.withLock { $0 = true }
        _ = thread.join()
        Glibc.close(fd)
    }
}

extension KNetTests {
    @Test("a Swift codec's frames dribbled a byte at a time, split at every position and batched arrive whole, in order")
    func wireSwiftCodecDribbleSplitBatch() throws {
        let handler = RecordingHandler()
        let harness = try ServerHarness(handler: handler, codec: WireCodec())
        let peer = try PlainSocket(port: harness.port)
        #expect(eventually { handler.connectionCount == 1 })
        let bodies: [[UInt8]] = [[], [7], pattern(WireCodec.maxBody)]
        let blob = bodies.flatMap(WireCodec.frame)
        var base = harness.server.stats.bytesIn
        for i in 0..<blob.count {
            try peer.write([blob[i]])
            #expect(eventually { harness.server.stats.bytesIn >= base + UInt64(i + 1) })
        }
        for cut in 1..<blob.count {
            base = harness.server.stats.bytesIn
            try peer.write(Array(blob[0..<cut]))
            #expect(eventually { harness.server.stats.bytesIn >= base + UInt64(cut) })
            try peer.write(Array(blob[cut...]))
        }
        let rounds = blob.count
        var many: [[UInt8]] = []
        for i in 0..<2000 { many.append(pattern(i % 9, offset: i)) }
        try peer.write(many.flatMap(WireCodec.frame))
        let expected = Array(repeating: bodies, count: rounds).flatMap { $0 } + many
        #expect(eventually { handler.totalMessages >= expected.count })
        #expect(handler.only?.messages == expected)
        #expect(handler.only?.disconnects == 0)
        #expect(harness.stop() == .serverClosed)
    }

    @Test("a Swift codec's frame of exactly maxFrameSize is delivered; one byte over closes that connection alone with .codec")
    func wireSwiftCodecMaxFrame() throws {
        let handler = RecordingHandler(echo: true)
        let harness = try ServerHarness(handler: handler, codec: WireCodec())
        let good = try PlainSocket(port: harness.port)
        #expect(eventually { handler.connectionCount == 1 })
        let bad = try PlainSocket(port: harness.port)
        #expect(eventually { handler.connectionCount == 2 })
        let exact = WireCodec.frame(pattern(WireCodec.maxBody))
        try good.write(exact)
        #expect(try good.read(exactly: exact.count) == exact)
        let over = WireCodec.frame(pattern(WireCodec.maxBody + 1))
        for byte in over {
            if (try? bad.write([byte])) == nil { break }
        }
        #expect(eventually { handler.snapshot.connections[1]?.disconnects == 1 })
        let record = handler.snapshot.connections[1]
        #expect(record?.reasonAtDisconnect == .error(.codec))
        #expect(record?.messages.isEmpty == true)
        try good.write(WireCodec.frame([1, 2, 3]))
        #expect(try good.read(exactly: 6) == WireCodec.frame([1, 2, 3]))
        #expect(handler.snapshot.connections[0]?.disconnects == 0)
        #expect(harness.stop() == .serverClosed)
    }

    @Test("urgent data in a raw stream: every in-band byte once, in order; no spin; still serving", arguments: [1, 2000])
    func wireUrgentDataRaw(chunk: Int) throws {
        let handler = RecordingHandler()
        let harness = try ServerHarness(handler: handler, codec: nil)
        let peer = try PlainSocket(port: harness.port)
        #expect(eventually { handler.connectionCount == 1 })
        var sent: [UInt8] = []
        for round in 0..<40 {
            let data = pattern(chunk, offset: round)
            let base = harness.server.stats.bytesIn
            try peer.write(Array(data[..<(data.count / 2)]))
            var urgent: UInt8 = 0x21
            #expect(send(peer.fd, &urgent, 1, Int32(MSG_OOB | MSG_NOSIGNAL)) == 1)
            try peer.write(Array(data[(data.count / 2)...]))
            sent += data
            #expect(eventually { harness.server.stats.bytesIn >= base + UInt64(data.count) })
        }
        #expect(eventually { handler.totalBytes >= sent.count })
        var urgent: UInt8 = 0x3F
        #expect(send(peer.fd, &urgent, 1, Int32(MSG_OOB | MSG_NOSIGNAL)) == 1)
        let cpu0 = cpuMilliseconds()
        let start = ContinuousClock.now
        while ContinuousClock.now - start < .milliseconds(300) { usleep(10_000) } // a measuring window
        let used = cpuMilliseconds() - cpu0
        #expect(used < 150, "CPU time while idle with urgent data pending: \(used) ms")
        #expect(handler.only?.bytes == sent)
        try peer.write([9, 9])
        #expect(eventually { handler.totalBytes == sent.count + 2 })
        #expect(handler.only?.disconnects == 0)
        #expect(harness.stop() == .serverClosed)
    }

    @Test("a peer that half-closes with 8 MiB queued for it and reads after its FIN gets every byte, then EOF; reason .endOfStream")
    func wireHalfCloseWithQueue() throws {
        let connection = Locked<TCPConnection?>(nil)
        let handler = RecordingHandler(onConnect: { conn in connection.withLock { $0 = conn } })
        let harness = try ServerHarness(handler: handler, codec: nil)
        let peer = try PlainSocket(port: harness.port)
        #expect(eventually { connection.withLock { $0 } != nil })
        let conn = try #require(connection.withLock { $0 })
        let chunk = 64 * 1024
        for i in 0..<128 { try conn.send(pattern(chunk, offset: i * chunk)) }
        peer.shutdownWrite()
        #expect(eventually {
            do { try conn.send([]) } catch { return true } // an empty raw send queues nothing
            return false
        })
        var received = 0
        var intact = true
        try peer.readToEnd { bytes in
            if bytes != pattern(bytes.count, offset: received) { intact = false }
            received += bytes.count
        }
        #expect(received == chunk * 128)
        #expect(intact)
        #expect(eventually { handler.only?.disconnects == 1 })
        #expect(handler.only?.reasonAtDisconnect == .error(.endOfStream))
        #expect(harness.stop() == .serverClosed)
    }

    @Test("a plain server dribbles a Swift codec's frames to a TCPClient: the limit arrives whole, one byte over ends it with .codec")
    func wireClientSwiftCodecDribble() throws {
        let listener = try PlainListener()
        let handler = RecordingHandler()
        let harness = ClientHarness(port: listener.port, handler: handler, codec: WireCodec())
        let peer = try listener.accept()
        #expect(eventually { handler.connectionCount == 1 })
        let exact = WireCodec.frame(pattern(WireCodec.maxBody))
        for byte in exact { try peer.write([byte]) }
        #expect(eventually { handler.totalMessages == 1 })
        #expect(handler.only?.messages == [pattern(WireCodec.maxBody)])
        for byte in WireCodec.frame(pattern(WireCodec.maxBody + 1)) {
            if (try? peer.write([byte])) == nil { break }
        }
        // The persistent client dials again once the connection ended: look at the first.
        #expect(eventually { handler.snapshot.connections[0]?.disconnects == 1 })
        #expect(handler.snapshot.connections[0]?.reasonAtDisconnect == .error(.codec))
        #expect(handler.snapshot.connections[0]?.messages.count == 1)
        #expect(harness.stop() == .clientClosed)
    }

    @Test("a server that accepts and at once closes or resets: a TCPClient's connect(true) and connect(false) pair up",
          arguments: [(false, false), (false, true), (true, false), (true, true)])
    func wireClientAgainstAcceptAndClose(reset: Bool, retry: Bool) throws {
        let server = try AcceptAndClose(reset: reset)
        let handler = PairCounter()
        let client = TCPClient("127.0.0.1:\(server.port)")
        if retry {
            client.enableRetry()
            client.setRetryBackoff(initial: .milliseconds(50), max: .milliseconds(400))
        }
        let serving = Background { try client.dialAndServe(handler: handler, codec: WireCodec()) }
        let start = ContinuousClock.now
        while ContinuousClock.now - start < .milliseconds(300) && !serving.isFinished { usleep(5_000) }
        client.close()
        let error = serving.join() as? KNetError
        if error != .clientClosed {
            #expect(reset && !retry, "dialAndServe threw \(String(describing: error))")
        }
        #expect(handler.ups.load(ordering: .relaxed) == handler.downs.load(ordering: .relaxed))
        #expect(handler.unpaired.load(ordering: .relaxed) == 0)
        server.stop()
    }
}
