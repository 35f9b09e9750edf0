// The capacity promise of small messages (TCPHandler.receive: an array knet made holds at
// most 4 x its count, or 64 bytes) when the handler keeps them.
#if canImport(Glibc)
import Glibc
#endif
import KNet
import Testing

/// Keeps every message. After a message starting with 0xA5 it shapes the loop thread's
/// heap so that the next allocation of that message's capacity is served from a free
/// chunk 16 bytes larger (as a busy heap does by chance: glibc hands out a whole free
/// chunk when the rest would be too small to split off).
final class HeapShapingHandler: TCPHandler {
    struct State: Sendable {
        var kept: [[UInt8]] = []
        var held: [[UInt8]] = []
    }
    let state = Locked(State())

    func receive(_ conn: TCPConnection, _ buf: [UInt8]) {
        state.withLock { $0.kept.append(buf) }
        guard buf.first == 0xA5 else { return }
        let capacity = buf.capacity
        var larger: [[UInt8]] = []
        var held: [[UInt8]] = []
        for _ in 0..<32 {
            larger.append([UInt8](unsafeUninitializedCapacity: capacity + 16) { _, n in n = 0 })
            held.append([UInt8](unsafeUninitializedCapacity: 8) { _, n in n = 0 }) // no coalescing
        }
        // Take the free chunks of the exact size, so the next request finds the larger ones.
        for _ in 0..<64 { held.append([UInt8](unsafeUninitializedCapacity: capacity) { _, n in n = 0 }) }
        larger.removeAll()
        state.withLock { $0.held += held }
    }
}

extension KNetTests {
    @Test("kept small messages copied under a kept array's storage still hold at most 4x their count (or 64 bytes)",
          arguments: [false, true])
    func keptSmallMessageCapacityBound(raw: Bool) throws {
        let handler = HeapShapingHandler()
        let server = try ServerHarness(handler: handler, codec: raw ? nil : StdCodec())
        let peer = try PlainSocket(port: server.port)
        var expected = 0
        func send(_ body: [UInt8]) throws {
            try peer.write(raw ? body : [UInt8(body.count >> 8), UInt8(body.count & 0xff)] + body)
            expected += 1
            let count = expected
            try #require(eventually { handler.state.withLock { $0.kept.count } == count })
        }
        var violations: [String] = []
        for round in 0..<8 {
            var shaping = pattern(900 - 37 * round)
            shaping[0] = 0xA5
            try send(shaping)
            let capacity = try #require(handler.state.withLock { $0.kept.last?.capacity })
            // The smallest message whose bound (4 x count) still admits that capacity.
            var next = pattern((capacity + 3) / 4)
            next[0] = 0
            try send(next)
            let kept = try #require(handler.state.withLock { $0.kept.last })
            if kept.capacity > max(4 * kept.count, 64) {
                violations.append("a \(kept.count)-byte message holds \(kept.capacity) bytes")
            }
        }
        #expect(violations == [])
        #expect(server.stop() == .serverClosed)
    }
}
