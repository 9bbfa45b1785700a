import { describeOrdersService } from '../../shared/test/orders-service-suite.ts'

describeOrdersService('fastify-app', {
  metrics: false,
  banner: /orders service \(fastify\) listening on (http:\/\/\S+)/,
})
