// Peers that misbehave on the wire against a Swift server: a Swift codec's frames
// dribbled a byte per write (each read by knet before the next goes), split at every
// position, many in one write, exactly the limit and one byte over; urgent data in a raw
// stream (the Swift layer's read-into-array path); a half-close with a queue waiting.
#if canImport(Glibc)
import Glibc
#endif
import Foundation
import KNet
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
}
