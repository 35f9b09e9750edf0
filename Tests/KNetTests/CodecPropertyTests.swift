// Property-style tests of the built-in codecs (C ones and their Swift read/write) against a
// reference model in this file: random frames written in random splits, a seeded generator.
#if canImport(Glibc)
import Glibc
#endif
import KNet
import Testing

/// A small deterministic generator (SplitMix64): the same seed gives the same run.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// A length-prefixed framing as the reference model sees it.
struct FramingModel: Sendable {
    let lengthBytes: Int
    let little: Bool
    let maxBody: Int

    func encode(_ body: [UInt8]) -> [UInt8] {
        encodeHeader(body.count) + body
    }

    func encodeHeader(_ length: Int) -> [UInt8] {
        var header = [UInt8](repeating: 0, count: lengthBytes)
        for i in 0..<lengthBytes {
            let byte = UInt8(truncatingIfNeeded: UInt64(length) >> (8 * UInt64(i)))
            header[little ? i : lengthBytes - 1 - i] = byte
        }
        return header
    }
}

enum PropertyCodec: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case std, lf1, lf2LittleMax1000, lf4Max1M, lf8LittleMax300k
    case swiftStd, swiftLf1, swiftLf2LittleMax1000, swiftLf8LittleMax300k

    var testDescription: String { rawValue }

    var model: FramingModel {
        switch self {
        case .std, .swiftStd: return FramingModel(lengthBytes: 2, little: false, maxBody: 65_535)
        case .lf1, .swiftLf1: return FramingModel(lengthBytes: 1, little: false, maxBody: 100)
        case .lf2LittleMax1000, .swiftLf2LittleMax1000: return FramingModel(lengthBytes: 2, little: true, maxBody: 1000)
        case .lf4Max1M: return FramingModel(lengthBytes: 4, little: false, maxBody: 1 << 20)
        case .lf8LittleMax300k, .swiftLf8LittleMax300k: return FramingModel(lengthBytes: 8, little: true, maxBody: 300_000)
        }
    }

    func make() -> any Codec {
        switch self {
        case .std: return StdCodec()
        case .lf1: return LengthFieldCodec(lengthBytes: 1, maxFrame: 100)
        case .lf2LittleMax1000: return LengthFieldCodec(lengthBytes: 2, endianness: .little, maxFrame: 1000)
        case .lf4Max1M: return LengthFieldCodec(lengthBytes: 4, maxFrame: 1 << 20)
        case .lf8LittleMax300k: return LengthFieldCodec(lengthBytes: 8, endianness: .little, maxFrame: 300_000)
        case .swiftStd: return SwiftOnly(StdCodec())
        case .swiftLf1: return SwiftOnly(LengthFieldCodec(lengthBytes: 1, maxFrame: 100))
        case .swiftLf2LittleMax1000: return SwiftOnly(LengthFieldCodec(lengthBytes: 2, endianness: .little, maxFrame: 1000))
        case .swiftLf8LittleMax300k: return SwiftOnly(LengthFieldCodec(lengthBytes: 8, endianness: .little, maxFrame: 300_000))
        }
    }
}

extension KNetTests {
    @Test("built-in codecs: random frames in random splits arrive intact and in order; an oversized one closes with .codec",
          arguments: PropertyCodec.allCases)
    func codecRandomSplits(codec: PropertyCodec) throws {
        let model = codec.model
        var rng = SplitMix64(seed: 0x6B6E_6574 &+ UInt64(codec.rawValue.utf8.count))
        // Frames: mostly small, some at the edges (0, 1, max), a few large; bounded in total.
        var frames: [[UInt8]] = []
        var total = 0
        while frames.count < 300 && total < 1_500_000 {
            let size: Int
            switch Int.random(in: 0..<10, using: &rng) {
            case 0: size = 0
            case 1: size = model.maxBody
            case 2: size = Int.random(in: 0...model.maxBody, using: &rng)
            default: size = Int.random(in: 0...min(300, model.maxBody), using: &rng)
            }
            frames.append(pattern(size, offset: frames.count))
            total += size
        }
        var stream: [UInt8] = []
        for frame in frames { stream += model.encode(frame) }

        let handler = RecordingHandler()
        let server = try ServerHarness(handler: handler, codec: codec.make())
        let peer = try PlainSocket(port: server.port)
        #expect(eventually { handler.only?.object != nil })
        var offset = 0
        while offset < stream.count {
            // Splits of 1 byte to 64 KiB + a bit: across headers, bodies and read buffers.
            let limit = Int.random(in: 0..<4, using: &rng) == 0 ? 70_000 : 17
            let take = min(stream.count - offset, Int.random(in: 1...limit, using: &rng))
            try peer.write(Array(stream[offset..<offset + take]))
            offset += take
        }
        #expect(eventually { handler.totalMessages >= frames.count })
        let received = handler.only?.messages ?? []
        #expect(received.count == frames.count)
        if received != frames {
            let first = (0..<min(received.count, frames.count)).first { received[$0] != frames[$0] } ?? min(received.count, frames.count)
            Issue.record("frame \(first) differs (of \(frames.count))")
        }

        // The other way: the codec's write frames exactly as the model does.
        let conn = try #require(handler.only?.object)
        for frame in frames { try conn.send(frame) }
        #expect(throws: KNetError.codec) { try conn.send([UInt8](repeating: 7, count: model.maxBody + 1)) }
        let back = try peer.read(exactly: stream.count)
        #expect(back == stream, "what the codec wrote differs from the model's framing")

        // An oversized frame (when the prefix can express one) closes with .codec and
        // nothing after it is delivered.
        if model.maxBody < (1 << (8 * min(model.lengthBytes, 4))) - 1 || model.lengthBytes == 8 {
            // The server may close (and reset) before the last bytes are written.
            try? peer.write(model.encode([1, 2, 3]) + model.encodeHeader(model.maxBody + 1)
                            + [UInt8](repeating: 9, count: min(model.maxBody + 1, 2000)) + model.encode([4]))
            #expect(eventually { handler.only?.disconnects == 1 })
            #expect(handler.only?.reasonAtDisconnect == .error(.codec))
            #expect(handler.only?.messages.count == frames.count + 1)
            #expect(handler.only?.messages.last == [1, 2, 3])
        }
        #expect(server.stop() == .serverClosed)
    }
}

extension KNetTests {
    @Test("raw and framed messages: random splits, random kept arrays: stream intact, kept arrays intact, capacity at most 4x (or 64)",
          arguments: [false, true])
    func rawRandomSplitsKeptArrays(framed: Bool) throws {
        var rng = SplitMix64(seed: framed ? 0xF4A3 : 0x4A57)
        var stream: [UInt8] = []
        var chunks: [Int] = []
        var total = 0
        while total < 3_000_000 {
            let size: Int
            switch Int.random(in: 0..<6, using: &rng) {
            case 0: size = Int.random(in: 1...64, using: &rng)
            case 1: size = Int.random(in: 900...1100, using: &rng)
            case 2: size = Int.random(in: 1...65_535, using: &rng)
            case 3: size = Int.random(in: 4000...4200, using: &rng)
            default: size = Int.random(in: 1...300_000, using: &rng)
            }
            chunks.append(size)
            total += size
        }
        stream = pattern(total)
        struct Kept: Sendable { var offset: Int; var bytes: [UInt8] }
        struct State: Sendable {
            var received = 0
            var kept: [Kept] = []
            var capacityViolations: [String] = []
            var rng = SplitMix64(seed: 99)
            var concatenated: [UInt8] = []
        }
        let state = Locked(State())
        let handler = RecordingHandler(keepObjects: false, onReceive: { _, buf in
            state.withLock { s in
                if buf.capacity > max(4 * buf.count, 64) && s.capacityViolations.count < 5 {
                    s.capacityViolations.append("count \(buf.count) capacity \(buf.capacity)")
                }
                if Int.random(in: 0..<3, using: &s.rng) == 0 { s.kept.append(Kept(offset: s.received, bytes: buf)) }
                s.concatenated += buf
                s.received += buf.count
            }
        })
        let model = FramingModel(lengthBytes: 2, little: false, maxBody: 65_535)
        let server = try ServerHarness(handler: handler, codec: framed ? StdCodec() : nil)
        let peer = try PlainSocket(port: server.port)
        #expect(eventually { handler.connectionCount == 1 })
        var offset = 0
        for size in chunks {
            if framed {
                // Frames of at most 65535 bytes, written in one go with their header.
                var rest = size
                var wire: [UInt8] = []
                while rest > 0 {
                    let body = min(rest, 65_535)
                    wire += model.encode(Array(stream[offset..<offset + body]))
                    offset += body
                    rest -= body
                }
                try peer.write(wire)
            } else {
                try peer.write(Array(stream[offset..<offset + size]))
                offset += size
            }
        }
        #expect(eventually(.seconds(30)) { state.withLock { $0.received } >= total })
        let final = state.withLock { $0 }
        #expect(final.received == total)
        #expect(final.concatenated == stream, "the stream arrived intact")
        var bad = 0
        for kept in final.kept where kept.bytes != Array(stream[kept.offset..<kept.offset + kept.bytes.count]) {
            bad += 1
        }
        #expect(bad == 0, "\(bad) of \(final.kept.count) kept arrays changed")
        #expect(final.capacityViolations == [])
        #expect(server.stop() == .serverClosed)
    }
}

extension KNetTests {
    @Test("eight connections at once, random splits, two of them turning bad midway: the others get every frame",
          arguments: [PropertyCodec.lf2LittleMax1000, .swiftLf2LittleMax1000])
    func concurrentRandomSplitsWithBadPeers(codec: PropertyCodec) throws {
        let model = codec.model
        let handler = RecordingHandler()
        let server = try ServerHarness(handler: handler, codec: codec.make())
        let peers = 8
        let framesPerPeer = 400
        let writers = (0..<peers).map { index in
            Background {
                var rng = SplitMix64(seed: UInt64(index) &* 7919)
                let peer = try PlainSocket(port: server.port)
                var stream: [UInt8] = []
                for n in 0..<framesPerPeer {
                    var frame = pattern(Int.random(in: 1...model.maxBody, using: &rng), offset: n)
                    frame[0] = UInt8(index)
                    stream += model.encode(frame)
                }
                if index >= peers - 2 { stream += model.encodeHeader(model.maxBody + 1) + [1, 2, 3] }
                var offset = 0
                while offset < stream.count {
                    let take = min(stream.count - offset, Int.random(in: 1...3000, using: &rng))
                    try peer.write(Array(stream[offset..<offset + take]))
                    offset += take
                }
                // Stay connected until the server saw everything (or closed us).
                _ = try? peer.read()
            }
        }
        #expect(eventually(.seconds(30)) {
            let connections = handler.snapshot.connections.values
            return connections.count == peers
                && connections.filter { $0.disconnects == 1 }.count == 2
                && connections.filter { $0.messages.count == framesPerPeer }.count == peers
        })
        for record in handler.snapshot.connections.values {
            let index = Int(record.messages.first?.first ?? 255)
            var rng = SplitMix64(seed: UInt64(index) &* 7919)
            var expected: [[UInt8]] = []
            for n in 0..<framesPerPeer {
                var frame = pattern(Int.random(in: 1...model.maxBody, using: &rng), offset: n)
                frame[0] = UInt8(index)
                expected.append(frame)
            }
            #expect(record.messages == expected, "peer \(index)")
            #expect(record.disconnects == (index >= peers - 2 ? 1 : 0), "peer \(index)")
            if index >= peers - 2 { #expect(record.reasonAtDisconnect == .error(.codec)) }
        }
        #expect(server.stop() == .serverClosed)
        for writer in writers { _ = writer.join() }
    }
}
